"""What runs inside each Ray Train worker."""
