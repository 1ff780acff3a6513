/* NBD protocol numbers (the NBD project's proto.md; the same names as
 * src/sanvisor/storage/nbdproto.py) and big-endian wire helpers. */
#ifndef SV_NBD_H
#define SV_NBD_H
#include <stdint.h>

#define NBD_MAGIC 0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_IHAVEOPT 0x49484156454F5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x3e889045565a9ULL
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u

#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES (1u << 1)

#define NBD_OPT_EXPORT_NAME 1u
#define NBD_OPT_ABORT 2u
#define NBD_OPT_LIST 3u
#define NBD_OPT_INFO 6u
#define NBD_OPT_GO 7u
#define NBD_OPT_X_FENCE 0x53560001u /* sanvisor's vendor option: docs/lab.md "Fencing" */

#define NBD_REP_ACK 1u
#define NBD_REP_SERVER 2u
#define NBD_REP_INFO 3u
#define NBD_REP_ERR (1u << 31)
#define NBD_REP_ERR_UNSUP ((1u << 31) + 1)
#define NBD_REP_ERR_POLICY ((1u << 31) + 2)
#define NBD_REP_ERR_INVALID ((1u << 31) + 3)
#define NBD_REP_ERR_UNKNOWN ((1u << 31) + 6)

#define NBD_INFO_EXPORT 0u
#define NBD_INFO_BLOCK_SIZE 3u
#define NBD_INFO_X_SESSION 0x5356u /* vendor: the array's id of this session (u64) */

#define NBD_TF_HAS_FLAGS (1u << 0)
#define NBD_TF_SEND_FLUSH (1u << 2)
#define NBD_TF_SEND_FUA (1u << 3)
#define NBD_TF_SEND_TRIM (1u << 5)
#define NBD_TF_SEND_WRITE_ZEROES (1u << 6)

#define NBD_CMD_READ 0u
#define NBD_CMD_WRITE 1u
#define NBD_CMD_DISC 2u
#define NBD_CMD_FLUSH 3u
#define NBD_CMD_TRIM 4u
#define NBD_CMD_CACHE 5u
#define NBD_CMD_WRITE_ZEROES 6u
#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)

#define NBD_EIO 5u
#define NBD_EINVAL 22u
#define NBD_ENOSPC 28u

#define NBD_MAX_REQUEST (32u << 20) /* larger reads: EINVAL; larger writes: closed */
#define NBD_MAX_FENCE 64 /* session ids in one fence option */
#define NBD_MAX_OPTION 65536u /* option data longer than this closes the connection */
#define NBD_REQUEST_SIZE 28
#define NBD_REPLY_SIZE 16

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) {
	put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v);
}
static inline void put64(uint8_t *p, uint64_t v) {
	put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v);
}
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t get32(const uint8_t *p) {
	return ((uint32_t)get16(p) << 16) | get16(p + 2);
}
static inline uint64_t get64(const uint8_t *p) {
	return ((uint64_t)get32(p) << 32) | get32(p + 4);
}
#endif
