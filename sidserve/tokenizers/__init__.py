"""Tokenizers: the shared interface and artifact format (``base``), the type registry
(``registry``), ADC-SID (``adc_sid``) and the baselines (``baselines``)."""
