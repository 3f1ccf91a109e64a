"""slicerside"""
