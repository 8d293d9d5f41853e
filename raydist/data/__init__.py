"""Data: the registry of data sets (registry), their loaders as uint8 tensors (sources), splits and
shards (splits), sizes known before loading (sizes), the published files (published), image folders
(folder) and batched augmentation on the device (augment). Ray never enters here."""
