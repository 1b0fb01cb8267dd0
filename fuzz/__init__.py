"""Coverage-guided fuzzing harnesses (atheris), run on demand: ``python -m fuzz.header -max_total_time=600``."""
