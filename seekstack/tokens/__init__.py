"""After the tokenizer (`seekstack data tokenize`): memory-mapped token shards, difficulty buckets, and the
scheduled mixture sampler that feeds the trainer."""
