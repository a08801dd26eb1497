"""Reading and writing packed speech datasets on HDFS, local disk or any pyarrow filesystem."""
