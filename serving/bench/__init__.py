"""``pdserve bench``: an online serving benchmark for any OpenAI-compatible server.

``workload`` builds the prompts (random token ids, a shared prefix, or a JSONL file),
``client`` sends them as streaming requests with httpx at a fixed concurrency or a
Poisson request rate and times each one, ``metrics`` turns the per-request records
into throughput and latency percentiles, and ``report`` prints the tables and ratios
and writes the JSON and the PNG. ``serving.commands.bench`` is the command line.
"""
