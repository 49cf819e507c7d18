"""The Ray jobs, one folder or module per stage: ``catalog`` (the pre-pass they share),
``train`` (Ray Train fit of ADC-SID; baselines on a streamed sample), ``assign`` (Ray Data
assignment and snapshot publish), ``refresh`` (the nightly job)."""
