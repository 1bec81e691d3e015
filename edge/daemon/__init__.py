"""The running kit: capture and inference threads, the live state, storage and the outbox."""
