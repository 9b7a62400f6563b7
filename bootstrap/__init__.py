"""The bootstrap node process."""
