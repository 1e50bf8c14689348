/* The library's self-description: the ISA it was built for and the layout of its interface. */
#include "internal.h"

#define DESCRIBE_FIELD(type, name) #type " " #name ";"
#define DESCRIBE_STRUCT(name, FIELDS) #name "{" FIELDS(DESCRIBE_FIELD) "}"
#define DESCRIBE_ENTRY(name, args) #name "(" #args ");"

static const char abi[] = MSGC_STRUCTS(DESCRIBE_STRUCT) MSGC_ENTRIES(DESCRIBE_ENTRY);

const char *msgc_abi(void) { return abi; }

const char *msgc_isa(void) { return MSGC_ISA_NAME; }

i32 msgc_describe(const msgc_info *a) {
  a->out[0] = VL;
  a->out[1] = NREG;
  a->out[2] = MSGC_BLOCK;
  a->out[3] = MSGC_MAX_TAPS;
  a->out[4] = msgc_wide_families;
  return MSGC_OK;
}
