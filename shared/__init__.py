"""What the API and the worker both import: settings, the wire schema, the stream protocol."""
