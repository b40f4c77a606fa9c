"""fluxrt.engines"""
