"""fluxrt.runtime"""
