"""Raw text to a clean corpus (`seekstack data build`): sources, quality rules, exact and near-duplicate removal,
PII scrubbing, the validation split and the report. Everything here works on text, before any tokenizer."""
