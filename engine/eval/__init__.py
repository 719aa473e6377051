"""The evaluation harness, built on the engine and never imported by it: bench.py's cells (cells.py),
their order (matrix.py) and report (report.py), the peers on our weights (peers.py) through a
transformers view of them (hf_view.py), quality metrics against FullKV (quality.py), and pass-key
haystacks (haystack.py)."""
