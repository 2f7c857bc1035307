"""Worker side: the per-head tables, observation windows and compression
dispatch (``runner.py``, a mixin), over vLLM's CPU runner (``cpu.py``).
Never imports the scheduler."""
