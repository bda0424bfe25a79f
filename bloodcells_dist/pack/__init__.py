"""The pack stage: from a folder of images (or a CSV listing) to verified WebDataset shards.

sources.py   the layouts a source can have (split folders, class folders, a CSV listing)
audit.py     unreadable files, exact and near duplicates, label conflicts, sizes, balance
cells.py     recovering the augmented copies of one source cell from the pixels
groups.py    the unit a split never cuts (cells, the listing's groups, files) and `auto`
splits.py    which split and fold each image goes to, by whole groups, stratified
shards.py    writing the tars and the manifest; verify
manifest.py  what a shard folder holds (read by every later stage)
interop.py   the descriptions other readers look for (timm, Hugging Face datasets, wids)
synthetic.py the synthetic stand-in dataset of the demo and the tests
"""
