"""Data: finding labelled X-rays, splitting them by patient, caching decoded pixels, serving batches."""
