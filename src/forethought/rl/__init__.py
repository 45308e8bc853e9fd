"""Model-free pieces the model-based methods reuse: replay buffers, SAC, tabular learners."""
