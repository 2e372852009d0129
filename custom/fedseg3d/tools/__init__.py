"""Command-line tools: assemble jobs, run them in the simulator, summarise results."""
