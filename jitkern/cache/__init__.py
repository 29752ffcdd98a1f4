"""Cache tiers below memory: the writable disk cache, read-only AOT directories, locks."""
