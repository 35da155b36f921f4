"""The seed of each sample of a batch, `SeedSequence([seed, epoch, index]).generate_state(1)[0]`, for a
whole batch of indices at once.

numpy's SeedSequence costs ~15 us per sample in Python-level calls, more than the rest of a sample's seeding
(`SampleSeeded`). Its algorithm (O'Neill's seed_seq hash: a pool of four 32-bit words, mixed from the
entropy words, then hashed out) is a fixed sequence of uint32 multiplies, xors and shifts, so it runs on
numpy arrays of indices as well as on one: the same values, bit for bit (tests/unit/test_data.py compares
them with SeedSequence itself), in ~1 us per sample. Entropy words over 32 bits (a seed >= 2**32) fall
back to SeedSequence.
"""
from __future__ import annotations

import numpy as np

_POOL = 4  # SeedSequence's default pool_size
_INIT_A, _MULT_A = np.uint32(0x43B0D7E5), np.uint32(0x931E8875)
_INIT_B, _MULT_B = np.uint32(0x8B51F9DD), np.uint32(0x58F38DED)
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_SHIFT = np.uint32(16)
_WORD = 1 << 32


def sample_seeds(seed: int, epoch: int, indices) -> np.ndarray:
    """uint32 seeds of `indices` (each < 2**32) in epoch `epoch` of a run seeded `seed`."""
    indices = np.asarray(indices, dtype=np.uint64)
    if seed >= _WORD or epoch >= _WORD or (indices.size and int(indices.max()) >= _WORD):
        return np.array([np.random.SeedSequence([seed, epoch, int(i)]).generate_state(1)[0] for i in indices],
                        dtype=np.uint32)
    words = [np.full(indices.shape, seed, np.uint32), np.full(indices.shape, epoch, np.uint32),
             indices.astype(np.uint32)]
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as the algorithm means it to
        return _hash_out(_mixed_pool(words))


def _mixed_pool(words: list[np.ndarray]) -> list[np.ndarray]:
    constant = [_INIT_A]  # advanced by every hash, in the order the algorithm hashes

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ constant[0]
        constant[0] = constant[0] * _MULT_A
        value = value * constant[0]
        return value ^ (value >> _SHIFT)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = _MIX_L * x - _MIX_R * y
        return result ^ (result >> _SHIFT)

    zero = np.zeros_like(words[0])
    pool = [hashmix(words[i] if i < len(words) else zero) for i in range(_POOL)]
    for source in range(_POOL):
        for target in range(_POOL):
            if source != target:
                pool[target] = mix(pool[target], hashmix(pool[source]))
    return pool  # three words fit the pool: no entropy is left over to mix in


def _hash_out(pool: list[np.ndarray]) -> np.ndarray:
    """The first word of `generate_state`: the pool's first word hashed with the second constant."""
    value = pool[0] ^ _INIT_B
    value = value * (_INIT_B * _MULT_B)
    return value ^ (value >> _SHIFT)
