"""Side-by-side benchmarks against peer engines (vLLM's CPU build, Hugging Face ``transformers``).

Each engine runs in its own process: ours in the project's environment, vLLM and Hugging Face in a
separate virtual environment (``make bench-peers`` builds it; vLLM is never a dependency of the
project). Modules here that a peer process imports use only the standard library.
"""
