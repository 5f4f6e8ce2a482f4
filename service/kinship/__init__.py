"""kinship"""
