"""modelstore"""
