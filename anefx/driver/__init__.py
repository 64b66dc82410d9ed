"""Layer 4, running passes: the pipeline, validation, instruments, reports, reproducers, bisection."""
