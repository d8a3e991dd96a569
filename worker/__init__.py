"""The arq worker: runs a generation backend and appends its tokens to each job's stream."""
