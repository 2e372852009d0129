"""Server-side FLARE components."""
