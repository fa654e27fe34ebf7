"""The one trainer: sharded, resumable, multi-host training for every stage."""
