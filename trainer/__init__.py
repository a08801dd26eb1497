"""The Deep Speech 2 trainer fed by the shard reader."""
