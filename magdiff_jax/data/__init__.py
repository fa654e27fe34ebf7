"""Data: video io, the synthetic dataset (the embedded default), and (to come) Grain pipelines and TFDS builders."""
