"""regiondrag.engine"""
