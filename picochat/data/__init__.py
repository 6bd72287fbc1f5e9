"""Pretraining data: shards on disk, the Hub downloader, offline sources, the packing loader."""
