"""Images in, uint8 batches out: shard writing, Ray Data reading, decode and augment, bad-sample policy.

    make_shards (shard_writer, sources) ─► {split}-NNNNNN.tar + {split}.manifest.json (manifest)
    index_shards (shard_writer) ─► the manifest of shards already made (img2dataset's 00000.tar …)
    expand_shards (shard_specs): lists, globs, brace patterns, folders -> shard locations, URIs kept
    build_image_dataset (datasets) = WebDatasetShards (tar_reader) ─► map_batches(decode_batch) (transforms, decode)
    WorkerBatches (worker_batches): exactly steps_per_epoch batches per Train worker per epoch
    BadSampleLedger (bad_samples): skipped samples counted, reported, and fatal above data.max_bad_fraction
"""
