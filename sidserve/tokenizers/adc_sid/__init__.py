"""ADC-SID / MMQ-v2: the network (``model``), the training step shared by ``fit`` and the
Ray Train job (``training``), collision regulation (``regulation``) and the tokenizer."""
