"""The HTTP tier: validates requests, enqueues jobs, relays each job's stream as SSE."""
