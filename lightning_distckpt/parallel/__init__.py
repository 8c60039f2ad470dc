"""Who writes and reads which bytes: tensor pieces, the DCP planners, and the process-group helpers.

No I/O and no knowledge of the on-disk format: planners decide which rank writes which chunk (each shared
chunk once, bytes balanced over ranks) and which stored chunks a rank's targets need.
"""
