def open_request(**kwargs):
    raise NotImplementedError
