"""regularizers"""
