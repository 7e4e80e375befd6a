"""Images in, uint8 batches out: shard writing, the shard plan, Ray Data reading, decode and augment, bad samples.

    make_shards (shard_writer, sources) ─► {split}-NNNNNN.tar + {split}.manifest.json (manifest)
    index_shards (shard_writer) ─► the manifest of shards already made (img2dataset's 00000.tar …)
    read_shard_set (shard_set): a spec's shards (shard_specs), their counts and classes, read once on the driver
    plan_epoch, SampleTally (epochs): an epoch's shard order and step count, the samples trained on for a resume
    build_image_dataset (datasets) = WebDatasetShards (tar_reader) ─► map_batches(decode_batch) (transforms, decode)
    on_device (device_decode): with data.decode_device=gpu the tasks only prepare rows, and each Train worker
        decodes its JPEGs on its GPU
    LocalImageStream (local_stream): the same rows and decode in one process, without Ray
    WorkerBatches (worker_batches): exactly the epoch's step count of batches per Train worker
    LocalLedger (bad_samples), RayLedger (ledger): skipped samples counted, and fatal above data.max_bad_fraction
"""
