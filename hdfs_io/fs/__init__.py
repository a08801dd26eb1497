"""The filesystem: local paths, file:// and hdfs:// URIs behind one adapter (pyarrow over libhdfs or hdfs-native),
opened per process, with Kerberos ticket caches and the HDFS client log."""
