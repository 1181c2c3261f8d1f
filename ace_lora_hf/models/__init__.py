"""Model families whose code ships to the Hub (each folder is copied as it is, for trust_remote_code)."""
