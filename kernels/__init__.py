"""regiondrag.kernels"""
