"""Database layer: tables, engine set-up per dialect, transaction runner and migrations."""
