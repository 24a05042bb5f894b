import os

os.environ.setdefault("NVFM_QUIET", "1")  # the backend table once per test session is noise
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
