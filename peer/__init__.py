"""The training peer process."""
