"""fluxrt.export"""
