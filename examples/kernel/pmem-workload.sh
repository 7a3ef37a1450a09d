i=0; while [ ! -b /dev/pmem0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
dd if=/dev/urandom of=/tmp/blob bs=4096 count=16 2>/dev/null
dd if=/tmp/blob of=/dev/pmem0 bs=4096 count=16 conv=fsync 2>/dev/null
dd if=/dev/pmem0 of=/tmp/back bs=4096 count=16 2>/dev/null
cmp /tmp/blob /tmp/back
