"""Studies that are not the product, each in its own folder with a README, its results and its
tests. They import kvbm; kvbm never imports them. Run them as modules from the repository root
(`python -m research.eviction.trace_replay`)."""
