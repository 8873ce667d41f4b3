"""regiondrag.export"""
