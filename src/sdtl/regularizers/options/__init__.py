"""Every regularizer's options: the keys of the config's ``regularizer`` section that method reads.

Torch-free modules, one per regularizer (named as the module of its class), so that the config can
read, check and describe a regularizer without importing torch (``sdtl --help`` stays fast).
"""
